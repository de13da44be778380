"""One spelling for things people write many ways, before two questions are compared.

"163 km" and "163 kilometers", "CHF" and "Swiss francs", "2025-10-05" and "the 5th of
October 2025", "C sharp" and "C#", "How much is 5 EUR in USD?" and "5 euros to US dollars?"
ask the same thing, with or without a greeting or a thank-you around it ("Hi! ... Thanks in
advance!"); the verifier should see the same tokens and keep its vetoes for real
differences (another unit, another date). Canonical names are lower case, so they never
look like a named entity. Typos in the new question are aligned
with the cached one's words first, so "Siwss feancs" still reads as "Swiss francs"; place
names never are ("Iraq" is not a typo of "Iran", nor "Slovakia" of "Slovenia").
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

# canonical token: its other spellings (multi-word ones included; matched case-insensitively,
# on word boundaries, longest first).
UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    # length and speed
    "km": ("kilometer", "kilometers", "kilometre", "kilometres", "kms"),
    "mile": ("miles", "mi"),
    "nmi": ("nautical mile", "nautical miles"),
    "ft": ("foot", "feet"),
    "inch": ("inches",),
    "cm": ("centimeter", "centimeters", "centimetre", "centimetres"),
    "mm": ("millimeter", "millimeters", "millimetre", "millimetres"),
    "meter": ("meters", "metre", "metres"),
    "yard": ("yards", "yd", "yds"),
    "lightyear": ("light year", "light years", "light-year", "light-years", "lightyears"),
    "mph": ("miles per hour", "mile per hour"),
    "kmh": ("kilometers per hour", "kilometres per hour", "km/h", "kph", "km per hour"),
    "mps": ("meters per second", "metres per second", "m/s", "meter per second"),
    "knot": ("knots",),
    # mass
    "kg": ("kilogram", "kilograms", "kilo", "kilos", "kgs"),
    "gram": ("grams",),
    "mg": ("milligram", "milligrams"),
    "lb": ("lbs",),
    "pound": ("pounds",),  # weight or money: kept apart from both lb and gbp
    "oz": ("ounce", "ounces"),
    "ton": ("tons",),
    "tonne": ("tonnes", "metric ton", "metric tons"),
    # volume
    "liter": ("liters", "litre", "litres"),
    "ml": ("milliliter", "milliliters", "millilitre", "millilitres"),
    "gallon": ("gallons",),
    "pint": ("pints",),
    "quart": ("quarts",),
    "cup": ("cups",),
    "tbsp": ("tablespoon", "tablespoons", "tbs"),
    "tsp": ("teaspoon", "teaspoons"),
    "floz": ("fluid ounce", "fluid ounces", "fl oz", "fl. oz"),
    # temperature, energy, data, area
    "celsius": ("degrees celsius", "degree celsius", "centigrade"),
    "fahrenheit": ("degrees fahrenheit", "degree fahrenheit"),
    "calorie": ("calories",),
    "kcal": ("kilocalorie", "kilocalories"),
    "kwh": ("kilowatt hour", "kilowatt hours", "kilowatt-hour", "kilowatt-hours"),
    "kw": ("kilowatt", "kilowatts"),
    "watt": ("watts",),
    "joule": ("joules",),
    "byte": ("bytes",),
    "kb": ("kilobyte", "kilobytes"),
    "mb": ("megabyte", "megabytes"),
    "gb": ("gigabyte", "gigabytes"),
    "tb": ("terabyte", "terabytes"),
    "bit": ("bits",),
    "acre": ("acres",),
    "hectare": ("hectares",),
    "sqft": ("square foot", "square feet", "sq ft"),
    "%": ("percent", "per cent"),
    "second": ("seconds", "sec", "secs"),
    "minute": ("minutes", "mins"),
    "hour": ("hours", "hrs"),
    "day": ("days",),
    "week": ("weeks",),
    "month": ("months",),
    "year": ("years",),
    "decade": ("decades",),
    # money: ISO codes for named currencies; a bare "dollar" or "franc" stays ambiguous
    "usd": ("us dollar", "us dollars", "u.s. dollars", "american dollar", "american dollars"),
    "eur": ("euro", "euros"),
    "gbp": ("british pound", "british pounds", "pound sterling", "pounds sterling",
            "sterling"),
    "jpy": ("japanese yen", "yen"),
    "inr": ("indian rupee", "indian rupees"),
    "cny": ("chinese yuan", "yuan", "renminbi", "rmb"),
    "cad": ("canadian dollar", "canadian dollars"),
    "aud": ("australian dollar", "australian dollars"),
    "nzd": ("new zealand dollar", "new zealand dollars"),
    "sgd": ("singapore dollar", "singapore dollars"),
    "hkd": ("hong kong dollar", "hong kong dollars"),
    "chf": ("swiss franc", "swiss francs"),
    "mxn": ("mexican peso", "mexican pesos"),
    "brl": ("brazilian real", "brazilian reais", "reais"),
    "krw": ("south korean won", "korean won"),
    "sek": ("swedish krona", "swedish kronor"),
    "nok": ("norwegian krone", "norwegian kroner"),
    "dkk": ("danish krone", "danish kroner"),
    "zar": ("south african rand", "south african rands"),
    "rub": ("russian ruble", "russian rubles", "russian rouble", "russian roubles", "rubles",
            "roubles", "ruble", "rouble"),
    "rupee": ("rupees",),
    "dollar": ("dollars",),
    "franc": ("francs",),
    "peso": ("pesos",),
}
# Countries under more than one name (a bare "US" is left alone: it is also a pronoun).
PLACE_ALIASES: dict[str, tuple[str, ...]] = {
    "uk": ("united kingdom", "great britain", "britain", "u.k."),
    "usa": ("united states", "united states of america", "u.s.a.", "u.s."),
    "turkey": ("türkiye", "turkiye"),
    "netherlands": ("the netherlands", "holland"),
    "czechia": ("czech republic",),
    "myanmar": ("burma",),
    "eswatini": ("swaziland",),
    "uae": ("united arab emirates",),
}
# Phrases that mean one word the verifier weighs ("eat" against "avoid", "for" / "against").
PHRASE_ALIASES: dict[str, tuple[str, ...]] = {
    "avoid": ("stay away from", "steer clear of", "keep away from"),
    "for": ("in favor of", "in favour of"),
}
LANGUAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "c#": ("c sharp", "csharp"),
    "f#": ("f sharp", "fsharp"),
    "c++": ("cpp",),
    "go": ("golang",),
    "javascript": ("js",),
    "objc": ("objective-c", "objective c"),
}
# Countries by their words (lower case, as `canonical` leaves them), so a name written in
# lower case or opening a sentence is still a name: "iraq" is never a typo of "iran". Left out:
# words that are as often something else (turkey, chad, guinea, china, jordan, georgia).
COUNTRIES = frozenset("""
afghanistan albania algeria andorra angola antigua argentina armenia australia austria
azerbaijan bahamas bahrain bangladesh barbados belarus belgium belize benin bhutan bolivia
bosnia botswana brazil brunei bulgaria burkina burundi cambodia cameroon canada chile
colombia comoros congo croatia cuba cyprus czechia denmark djibouti dominica ecuador egypt
eritrea estonia eswatini ethiopia fiji finland france gabon gambia germany ghana greece
grenada guatemala guyana haiti honduras hungary iceland india indonesia iran iraq ireland
israel italy jamaica japan kazakhstan kenya kiribati korea kosovo kuwait kyrgyzstan laos
latvia lebanon lesotho liberia libya liechtenstein lithuania luxembourg madagascar malawi
malaysia maldives mali malta mauritania mauritius mexico micronesia moldova monaco mongolia
montenegro morocco mozambique myanmar namibia nauru nepal netherlands nicaragua niger
nigeria norway oman pakistan palau palestine panama paraguay peru philippines poland
portugal qatar romania russia rwanda samoa senegal serbia seychelles singapore slovakia
slovenia somalia spain sudan suriname sweden switzerland syria taiwan tajikistan tanzania
thailand togo tonga trinidad tunisia turkmenistan tuvalu uganda ukraine uruguay uzbekistan
vanuatu vatican venezuela vietnam yemen zambia zimbabwe uk usa uae
""".split())
SMALL_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
# Number words the verifier reads as digits.
NUMBER_WORDS = {w: str(i) for i, w in enumerate(SMALL_NUMBERS)} | {
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
    "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000"}
# Short unit symbols mean a unit only right after a number ("5 g", "3 l", "20 m").
AFTER_NUMBER = {"g": "gram", "l": "liter", "m": "meter", "in": "inch", "c": "celsius",
                "f": "fahrenheit", "min": "minute", "h": "hour", "hr": "hour"}

_ALIAS_OF = {alias: canonical
             for table in (UNIT_ALIASES, PLACE_ALIASES, PHRASE_ALIASES, LANGUAGE_ALIASES)
             for canonical, aliases in table.items() for alias in aliases}
_ALIAS = re.compile(
    r"(?<![\w#+])(" + "|".join(re.escape(a) for a in sorted(_ALIAS_OF, key=len, reverse=True))
    + r")(?![\w#+])", re.IGNORECASE)
_SHORT_UNIT = re.compile(r"(?<=\d)(\s?)(" + "|".join(AFTER_NUMBER) + r")\b(?!['’]|\s*\d)",
                         re.IGNORECASE)

_MONTH = (r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(\d{4})"
_DATES = (  # (pattern, order of year, month, day among its groups)
    (re.compile(rf"\b{_MONTH}\s+{_DAY},?\s+{_YEAR}\b", re.IGNORECASE), (2, 0, 1)),
    (re.compile(rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}\b", re.IGNORECASE),
     (2, 1, 0)),
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), (0, 1, 2)),
)


# Asking to convert an amount: "How much is 5 eur in usd?", "5 eur to usd?", "What's 5 eur
# worth in usd?", "How many usd is 5 eur?", ... all read "convert 5 eur to usd". Applied after
# the aliases, so units and currencies already have one name each.
_UNIT = "|".join(re.escape(u) for u in sorted(
    set(UNIT_ALIASES) - {"%"} | set(AFTER_NUMBER.values()), key=len, reverse=True))
_NUMBER_WORD = "|".join(SMALL_NUMBERS)
_AMOUNT = rf"(?P<amount>\d[\d,]*(?:\.\d+)?|{_NUMBER_WORD})\s+(?P<source>{_UNIT})"
_TARGET = rf"(?P<target>{_UNIT})"
_ANY_AMOUNT = re.compile(_AMOUNT, re.IGNORECASE)
_CONVERSIONS = tuple(re.compile(r"\b" + pattern + r"(?=\s*(?:[?.!,:;]|$))", re.IGNORECASE)
                     for pattern in (
    rf"(?:convert|change)\s+{_AMOUNT}\s+(?:to|into|in)\s+{_TARGET}",
    rf"(?:(?:how\s+(?:much|fast|far|long|heavy|big))|what)\s+(?:is|are)\s+{_AMOUNT}\s+"
    rf"(?:in|to|into)\s+{_TARGET}",
    rf"(?:what's|what\s+is|how\s+much\s+is|how\s+much\s+are)\s+{_AMOUNT}\s+worth\s+in\s+"
    rf"{_TARGET}",
    rf"(?:i\s+need\s+|express\s+){_AMOUNT}\s+(?:expressed\s+|converted\s+)?in\s+{_TARGET}",
    rf"how\s+many\s+{_TARGET}\s+(?:is|are|are\s+in|is\s+in|in|make\s+up|are\s+there\s+in)\s+"
    rf"{_AMOUNT}",
    rf"{_AMOUNT}\s+(?:is|are|equals)\s+how\s+many\s+{_TARGET}",
    rf"if\s+a\s+recipe\s+calls\s+for\s+{_AMOUNT},?\s+how\s+many\s+{_TARGET}\s+is\s+that",
    rf"(?<![\w,.])(?<!\d\s)(?<!convert\s){_AMOUNT}\s+(?:to|into|in)\s+{_TARGET}",
))


# Courtesy around a question, never inside it: a greeting only when punctuation ends it
# ("Hello world in C" keeps its "Hello"), "can you" only before a verb that asks for an answer
# ("Can you speak French?" keeps it), a thank-you only after a sentence or a comma ("How do I
# say thank you" keeps its "thank you").
_ASKING = ("convert|translate|name|explain|give|list|write|calculate|compute|find|summari[sz]e|"
           "describe|suggest|recommend|define|tell")
_GREETING = re.compile(
    r"^\s*(?:(?:hi|hello|hey|greetings|good (?:morning|afternoon|evening))(?: there| all)?"
    r"\s*[,!.:;\-]+\s*|please,?\s+|quick question\s*[:,\-]\s*|"
    r"(?:please )?answer this(?: question)?\s*:\s*|"
    rf"(?:can|could|would|will) you(?: please)?\s+(?=(?:{_ASKING})\b)|"
    r"i(?:'d| would) like you to\s+|i need you to\s+)+", re.IGNORECASE)
_SIGN_OFF = re.compile(
    r"(?:(?<=[?.!,])|(?<=[?.!,][\"')]))\s*(?:(?:please help(?: me)?|please|pls|thanks|thank you|"
    r"thx|many thanks|much appreciated|cheers|any help is appreciated|"
    r"i(?:'d| would)(?: really)? appreciate it)"
    r"(?: (?:a lot|so much|in advance))?[\s.!?]*)+$", re.IGNORECASE)


SIGN_OFF_WINDOW = 120  # characters: a sign-off is short, and a search bounded to it stays
# linear on a long prompt of "thanks. thanks. ..." (unbounded, each "." restarts it: quadratic)


def _without_courtesy(text: str) -> str:
    bare = _GREETING.sub("", text, count=1)
    found = _SIGN_OFF.search(bare, max(0, len(bare) - SIGN_OFF_WINDOW))
    return (bare[:found.start()] if found else bare) or text


def canonical(text: str) -> str:
    """The text without a greeting or a thank-you around it, with dates as `year month day`,
    units, currencies, countries and languages under one name each, and requests to convert an
    amount as `convert 5 eur to usd`; everything else (case included) is left as it was."""
    text = _without_courtesy(text)
    text = text.replace("°", " ")  # 25°C: the symbol after a number, as "25 c"
    for pattern, order in _DATES:
        text = pattern.sub(lambda m, order=order: _date(m, order), text)
    text = _ALIAS.sub(lambda m: _ALIAS_OF[m.group(1).lower()], text)
    text = _SHORT_UNIT.sub(lambda m: m.group(1) + AFTER_NUMBER[m.group(2).lower()], text)
    return _conversion(text)


def _conversion(text: str) -> str:
    if not _ANY_AMOUNT.search(text):  # most texts: one cheap scan
        return text
    for pattern in _CONVERSIONS:
        text = pattern.sub(lambda m: "convert {} {} to {}".format(
            m["amount"].lower(), m["source"].lower(), m["target"].lower()), text)
    return text


def _date(match: re.Match[str], order: tuple[int, int, int]) -> str:
    year, month, day = (match.group(i + 1) for i in order)
    if not month.isdigit():
        month = str(_month_number(month))
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        return match.group(0)
    return f"{int(year)} {int(month)} {int(day)}"


def _month_number(name: str) -> int:
    return ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
            "dec"].index(name.lower()[:3]) + 1


_WORD = re.compile(r"[A-Za-z]{4,}")
# Place names (countries and their other names): one is never a typo of another.
PLACES = COUNTRIES | frozenset(
    alias for aliases in PLACE_ALIASES.values() for alias in aliases if _WORD.fullmatch(alias))


def align_typos(cached: str, new: str, is_variant: Callable[[str, str], bool]
                ) -> tuple[str, int]:
    """`new` with each word that is a spelling variant of a word of `cached` (and not a word
    `cached` has) replaced by that word, and how many were replaced. Two place names are
    never aligned ("Iraq" / "Iran", "Slovakia" / "Slovenia", "Zambia" / "Gambia")."""
    words = {w.lower() for w in _WORD.findall(cached)}
    new_words = {w.lower() for w in _WORD.findall(new)}
    candidates = sorted(words - new_words)
    fixes: dict[str, str] = {}
    for word in sorted(new_words - words):
        # a typo keeps its length within two letters and its first or its last letter: the
        # closest word is sought among those only (among all, two long prompts of unrelated
        # words took seconds)
        near = [w for w in candidates if abs(len(w) - len(word)) <= 2
                and (w[0] == word[0] or w[-1] == word[-1])]
        best = max(near, key=lambda w: difflib.SequenceMatcher(None, word, w).ratio(),
                   default=None)
        if best is not None and not {word, best} <= PLACES and is_variant(word, best):
            fixes[word] = best
            candidates.remove(best)
    if not fixes:
        return new, 0
    fixed = _WORD.sub(lambda m: fixes.get(m.group(0).lower(), m.group(0)), new)
    return fixed, len(fixes)
