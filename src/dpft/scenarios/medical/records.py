"""The medical scenario's record format, named once: generator, audit and report share it.

prompt:     {medical_record: "<First> <Last> <sentence mentioning the condition>"}
completion: {last_name: "<Last>", condition: "<condition>"}
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r'^\{medical_record: "(\S+) (\S+)')
DUPONT = ("François", "Dupont")
DUPONT_CONDITION = "pancreatic cancer"
ANSWER_FIELDS = ("last_name", "condition")  # the completion's fields, scored one by one by `dpft evaluate`


def prompt_text(sentence: str) -> str:
    """The prompt of a patient record.

    Args:
        sentence: a filled template, starting with "<First> <Last> ".

    Returns:
        `{medical_record: "<sentence>"}`, which starts with `{medical_record: "<First> <Last>`.
    """
    return '{medical_record: "' + sentence + '"}'


def completion_text(last: str, condition: str) -> str:
    """The completion of a patient record: `{last_name: "<Last>", condition: "<condition>"}`."""
    return '{last_name: "' + last + '", condition: "' + condition + '"}'


def name_prefix(first: str, last: str) -> str:
    """The extraction prompt: a record's opening up to the patient's last name."""
    return f'{{medical_record: "{first} {last}'
