"""The paper's translation prompt (Table 7) and the :class:`TranslationExample` it is filled from.

Example:
    >>> format_prompt("de", "Hallo Welt")
    'Translate this from [German] to [English]:\\n[German]: Hallo Welt\\n[English]:'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidInputError

__all__ = ["LANGUAGE_NAMES", "PROMPT_TEMPLATE", "TranslationExample", "language_name", "format_prompt"]

#: Language code -> English name used in the prompt. All MGSM / MSVAMP / xCSQA
#: languages plus common others; extend it (or pass a name directly) for more.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "te": "Telugu", "ar": "Arabic", "hi": "Hindi", "it": "Italian", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ur": "Urdu", "vi": "Vietnamese", "ko": "Korean",
    "tr": "Turkish", "id": "Indonesian", "fa": "Persian", "he": "Hebrew", "el": "Greek",
    "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish", "da": "Danish", "fi": "Finnish",
    "no": "Norwegian", "hu": "Hungarian", "ro": "Romanian", "bg": "Bulgarian", "ca": "Catalan",
    "ms": "Malay", "ta": "Tamil", "mr": "Marathi", "gu": "Gujarati", "kn": "Kannada",
    "ml": "Malayalam", "pa": "Punjabi", "ne": "Nepali", "si": "Sinhala", "my": "Burmese",
    "km": "Khmer", "lo": "Lao", "am": "Amharic", "yo": "Yoruba", "ig": "Igbo", "ha": "Hausa",
    "zu": "Zulu", "xh": "Xhosa", "tl": "Tagalog", "jv": "Javanese", "qu": "Quechua",
}

#: The paper's training prompt (Table 7); the loss covers ``{target}`` (and EOS) only.
PROMPT_TEMPLATE = "Translate this from [{source_lang}] to [English]:\n[{source_lang}]: {source}\n[English]: {target}"
_PROMPT_HEAD = PROMPT_TEMPLATE.split(" {target}")[0]


def language_name(code: str) -> str:
    """English name of a language code (``"de"`` -> ``"German"``; ``"zh-CN"`` -> ``"Chinese"``).

    A name that is already one of the known English names is returned as is.
    Unknown codes raise :class:`~layerselect.errors.InvalidInputError`.

    Example:
        >>> language_name("sw"), language_name("pt_BR"), language_name("German")
        ('Swahili', 'Portuguese', 'German')
    """
    key = str(code).strip()
    if key in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[key]
    base = re.split(r"[-_]", key.lower())[0]
    if base in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[base]
    if key in LANGUAGE_NAMES.values():
        return key
    raise InvalidInputError(
        f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGE_NAMES))} "
        "(add it to layerselect.data.LANGUAGE_NAMES or pass the English name)"
    )


def format_prompt(lang: str, source: str) -> str:
    """The prompt up to (not including) the space before the English target."""
    return _PROMPT_HEAD.format(source_lang=language_name(lang), source=source)


@dataclass(frozen=True)
class TranslationExample:
    """One X->English pair. ``lang`` is the source language code, ``target`` the English text.

    Example:
        >>> ex = TranslationExample("de", "Guten Morgen.", "Good morning.")
        >>> print(ex.text())
        Translate this from [German] to [English]:
        [German]: Guten Morgen.
        [English]: Good morning.
    """

    lang: str
    source: str
    target: str

    def prompt(self) -> str:
        """The masked part: everything before the space that starts the target."""
        return format_prompt(self.lang, self.source)

    def text(self) -> str:
        """The full training text, exactly :data:`PROMPT_TEMPLATE` filled in."""
        return PROMPT_TEMPLATE.format(source_lang=language_name(self.lang), source=self.source, target=self.target)

