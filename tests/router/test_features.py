import math

import numpy as np

from router.features import (
    ANSWER_FEATURES,
    FEATURE_NAMES,
    GROUPS,
    PROMPT_FEATURES,
    answer_features,
    feature_row,
    prompt_features,
)

GSM = "Seattle has 20 sheep. Charleston has 4 times as many. How many sheep do they have together?"


def value(row, name):
    return row[FEATURE_NAMES.index(name)]


def test_row_layout_and_missing_parts_are_nan():
    row = feature_row(GSM)
    assert row.shape == (len(FEATURE_NAMES),)
    assert sum(len(v) for v in GROUPS.values()) == len(FEATURE_NAMES)
    assert np.isnan(value(row, "a_log_chars")) and np.isnan(value(row, "lp_mean"))
    assert value(row, "p_how_many") == 1.0


def test_correct_arithmetic_and_final_answer():
    answer = "Charleston has 20 x 4 = <<20*4=80>>80 sheep.\nTogether 20 + 80 = 100.\n#### 100"
    row = feature_row(GSM, answer)
    assert value(row, "a_final_stated") == 1.0
    assert value(row, "a_arith_wrong") == 0.0 and value(row, "a_arith_checked") == 3.0
    assert value(row, "a_final_num_int") == 1.0
    assert value(row, "a_final_eq_last") == 1.0
    assert 0.85 < value(row, "a_final_pos") < 1.0


def test_arithmetic_that_does_not_check_out():
    answer = "20 x 4 = 90 sheep. Together 20 + 90 = 110.\n#### 95.5"
    row = feature_row(GSM, answer)
    assert value(row, "a_arith_wrong") == 1.0
    assert value(row, "a_final_num_int") == 0.0
    assert value(row, "a_final_eq_last") == 0.0


def test_multiple_choice_answer():
    prompt = "Which is a mammal?\nOptions:\nA. shark\nB. whale\nC. trout"
    row = feature_row(prompt, "Whales breathe air. The answer is (B).")
    assert value(row, "p_options") == 3.0
    assert value(row, "a_letter_valid") == 1.0
    assert value(feature_row(prompt, "The answer is (H)."), "a_letter_valid") == 0.0
    assert value(feature_row(prompt, "I'm not sure, maybe whales."), "a_final_stated") == 0.0


def test_computed_value_against_the_chosen_option():
    prompt = "How fast is it?\nOptions:\nA. 3.5 m/s\nB. 7.0 m/s\nC. fast"
    lands = feature_row(prompt, "v = 2 * 3.5 = 7.0 m/s. The answer is (B).")
    guessed = feature_row(prompt, "v = 2 * 1.6 = 3.2 m/s, closest to 3.5. The answer is (B).")
    assert value(lands, "a_option_number_gap") == -4.0  # log10 of the 1e-4 floor: exact
    assert value(guessed, "a_option_number_gap") > -1.5
    assert np.isnan(value(feature_row(prompt, "2 + 2 = 4. The answer is (C)."),
                          "a_option_number_gap"))


def test_where_the_chosen_option_stands_among_the_others():
    prompt = ("Speed?\nOptions:\nA. 1 m/s\nB. 2 m/s\nC. 3 m/s, measured at the top\nD. 4 m/s\n"
              "E. 5 m/s")
    middle = feature_row(prompt, "The answer is (C).")
    assert value(middle, "a_option_length_rank") == 1.0  # the longest option
    assert value(middle, "a_option_value_extremity") == 0.0  # the median value
    edge = feature_row(prompt, "The answer is (A).")
    assert value(edge, "a_option_length_rank") == 0.0
    assert value(edge, "a_option_value_extremity") == 1.0
    words = feature_row("Pick one.\nOptions:\nA. red\nB. green", "The answer is (B).")
    assert value(words, "a_option_length_rank") == 1.0
    assert np.isnan(value(words, "a_option_value_extremity"))
    assert np.isnan(value(feature_row(prompt, "#### 3"), "a_option_length_rank"))


def test_one_quantity_applied_to_several_others():
    prompt = "Tom found 214 shells, Nancy 432. Of all of them, 67 were cracked. How many are good?"
    misread = ("Tom kept 214 - 67 = <<214-67=147>>147.\nNancy kept 432 - 67 = <<432-67=365>>365."
               "\nTogether 147 + 365 = <<147+365=512>>512.\n#### 512")
    right = "They found 214 + 432 = <<214+432=646>>646.\n646 - 67 = <<646-67=579>>579.\n#### 579"
    assert value(feature_row(prompt, misread), "a_operand_reuse") == 1.0
    assert value(feature_row(prompt, right), "a_operand_reuse") == 0.0
    assert value(feature_row(prompt, right), "a_final_mentions") == 3.0  # note, result, answer
    assert np.isnan(value(feature_row(prompt, "About 600."), "a_operand_reuse"))


def test_hedges_refusals_and_logprobs():
    row = feature_row("Explain why.", "I'm sorry, I cannot answer. Maybe ask later?", [-0.1, -3.0])
    assert value(row, "a_refusal") >= 1 and value(row, "a_hedges") >= 1
    assert value(row, "lp_min") == -3.0 and value(row, "lp_low_frac") == 0.5
    entropy = feature_row("q", "a", [-0.1], top_logprobs=[[math.log(0.5), math.log(0.5)]])
    assert value(entropy, "lp_top_entropy") == np.float64(math.log(2))


def test_no_code_execution_in_arithmetic_check():
    answer = "__import__('os').system('x') = 3 and 9**9**9 = 1 and 2 * 3 = 6"
    assert answer_features("p", answer)[ANSWER_FEATURES.index("a_arith_checked")] == 1.0
    assert len(prompt_features("")) == len(PROMPT_FEATURES)


def test_marker_counts_ignore_case():
    answer = "MAYBE. Perhaps, I Think so. However, WAIT. As an AI, I can't say. Unlikely."
    row = feature_row("q", answer)
    assert value(row, "a_hedges") == 3.0  # MAYBE, Perhaps, I Think (not Unlikely)
    assert value(row, "a_self_correct") == 2.0  # However, WAIT
    assert value(row, "a_refusal") == 2.0  # As an AI, I can't
    units = feature_row("Run 5 km in 30 minutes at 2 m/s, not 5 KM.")
    assert value(units, "p_units") == 3.0


def test_phrases_match_whole_words_only():
    row = feature_row("Statement 10 | Is it true? How manyfold?", "A mighty, unwaited answer.")
    assert value(row, "p_true_false") == 0.0 and value(row, "p_how_many") == 0.0
    assert value(row, "a_hedges") == 0.0 and value(row, "a_self_correct") == 0.0
    row = feature_row("Statement 1 | Statement 2. How much?", "It might, or re-evaluate.")
    assert value(row, "p_true_false") == 1.0 and value(row, "p_how_many") == 1.0
    assert value(row, "a_hedges") == 1.0 and value(row, "a_self_correct") == 1.0
    refusals = feature_row("q", "I apologized: as an aide, I cannot answer.")
    assert value(refusals, "a_refusal") == 3.0  # refusal phrases may run on into a word
    # case-insensitive matching pairs letters that str.lower does not (İ with i)
    assert value(feature_row("q", "\u0130 THINK SO"), "a_hedges") == 1.0


def test_numbers_keep_their_value_without_marks():
    row = feature_row("Pay $1,200.50 and 15% of -$40.", "Total 1,200.5 - 6 = 1194.5")
    assert value(row, "p_max_number_log") == np.float64(math.log1p(1200.5))
    assert value(row, "a_prompt_numbers_used") == 1 / 3  # 1,200.5 (not 15 or -40)


def test_digit_and_capital_shares_count_ascii_only():
    text = "Ünïcode ÄB 12 ½ ٣"  # one ASCII capital, two ASCII digits
    row = feature_row(text)
    assert value(row, "p_digit_frac") == 2 / len(text)
    assert value(row, "p_upper_frac") == 1 / len(text)


def test_consistency_features_compare_final_answers():
    from router.features import CONSISTENCY_FEATURES, consistency_features

    assert all(math.isnan(v) for v in consistency_features("The answer is (B).", None))
    assert all(math.isnan(v) for v in consistency_features(None, ["The answer is (B)."]))
    samples = ["so the answer is (b).", "Answer: C", "I do not know."]
    sc = dict(zip(CONSISTENCY_FEATURES, consistency_features("The answer is (B).", samples),
                  strict=True))
    assert sc["sc_samples"] == 3.0
    assert sc["sc_agree"] == 1 / 3  # (b) agrees, C does not, the last states nothing
    assert sc["sc_distinct"] == 1 / 3  # B and C: one more than full agreement
    assert sc["sc_mode_share"] == 2 / 4
    assert sc["sc_stated"] == 2 / 3
    same_number = consistency_features("so 2 * 500 = 1000\n#### 1,000", ["The answer is 1000.0"])
    assert same_number[1:] == [1.0, 0.0, 1.0, 1.0]
    row = feature_row(GSM, "#### 100", samples=["#### 90"])
    assert value(row, "sc_agree") == 0.0 and value(row, "sc_distinct") == 1.0
    assert np.isnan(value(feature_row(GSM, "#### 100"), "sc_agree"))
