"""Tokenizers load as AutoTokenizer builds them, without its index of every transformers model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama3_dist

TOKENIZER = Path(llama3_dist.__file__).parent / "assets" / "llama3-tokenizer"


@pytest.mark.subprocess
def test_saved_tokenizer_equals_autotokenizers_without_importing_it():
    code = f"""
import sys
from llama3_dist.tokenizer import load_tokenizer
tokenizer = load_tokenizer({str(TOKENIZER)!r})
assert "transformers.models.auto.tokenization_auto" not in sys.modules, "AutoTokenizer was imported"
from transformers import AutoTokenizer
reference = AutoTokenizer.from_pretrained({str(TOKENIZER)!r})
assert type(tokenizer) is type(reference), (type(tokenizer), type(reference))
text = "Hello <|begin_of_text|> world\\t\\n é 123 <|eot_id|>"
assert tokenizer(text).input_ids == reference(text).input_ids
assert tokenizer.chat_template == reference.chat_template and tokenizer.all_special_ids == reference.all_special_ids
chat = [{{"role": "user", "content": "Hi"}}]
assert tokenizer.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
