"""Write the built-in `general` dataset: the built-in model's own answers to ordinary questions.

Mixed into the identity data by `lorakit quickstart`, these rows keep the fine-tuned model's
behaviour on everything that is not about its name ("self-distillation"): the training target is
what the base model already says. Each answer is the base model's greedy reply, cut after its
last complete sentence; a reply that `lorakit.data.builtin.degenerate` rejects (a loop, no
complete sentence) is dropped. Run once from the repository root; the output is committed:

    PYTHONPATH=src python scripts/make_general_data.py          # both splits
    PYTHONPATH=src python scripts/make_general_data.py test     # the held-out split only
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from lorakit.data.builtin import degenerate
from lorakit.models import BUILTIN_MODEL, load_model, load_tokenizer
from lorakit.train.evaluate import generate_samples

OUT = Path(__file__).parents[1] / "src" / "lorakit" / "data" / "datasets"
MAX_NEW_TOKENS = 64
TRAIN = [
    "What is the capital of Italy?",
    "What is the capital of Japan?",
    "What is the largest ocean on Earth?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What is the boiling point of water in Celsius?",
    "Which planet is closest to the Sun?",
    "What do bees make?",
    "What is the opposite of hot?",
    "Name three primary colors.",
    "What is 2 plus 2?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Who wrote Romeo and Juliet?",
    "What language is spoken in Brazil?",
    "What is photosynthesis?",
    "Why do we need sleep?",
    "Give me a synonym for happy.",
    "Translate 'thank you' into French.",
    "Write one sentence about the moon.",
    "Write a short sentence about autumn.",
    "Suggest a name for a pet cat.",
    "What is a healthy breakfast?",
    "How do I boil an egg?",
    "What is the main ingredient in bread?",
    "Give me a tip for studying better.",
    "What is the tallest mountain in the world?",
    "What is the freezing point of water?",
    "What is the speed of light?",
    "What is a noun?",
    "Explain what a computer is in one sentence.",
    "What is the largest animal on Earth?",
    "How many continents are there?",
    "What gas do humans breathe out?",
    "What is the square root of 16?",
    "Describe a rainbow in one sentence.",
    "What is the plural of mouse?",
    "Why is exercise good for you?",
    "What is the capital of Germany?",
    "Write a haiku about winter.",
]
# Held out: never trained on; the quickstart asks those the base model answers with the right
# fact (lorakit.data.builtin.GENERAL_FACTS) before and after fine-tuning, and every row scores
# forgetting (the answer loss on the base model's own answers).
TEST = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many hours are in a day?",
    "Name a fruit that is yellow.",
    "What is the capital of Spain?",
    "How many days are in a year?",
    "What is the chemical symbol for water?",
    "How many minutes are in an hour?",
    "What is the largest planet in our solar system?",
    "Who painted the Mona Lisa?",
    "What is the capital of England?",
    "How many sides does a triangle have?",
    "What is frozen water called?",
    "How many months are in a year?",
    "What animal says moo?",
    "What is the capital of Canada?",
    "Which planet is known as the Red Planet?",
    "What is the color of grass?",
    "What is the capital of Russia?",
    "What is the capital of China?",
    "What is the capital of Egypt?",
    "Who wrote Hamlet?",
    "What is the largest country in the world?",
    "How many legs does a dog have?",
    "How many wheels does a bicycle have?",
    "What is the boiling point of water in Fahrenheit?",
    "Who was the first president of the United States?",
    "How many seconds are in a minute?",
    "What is the capital of Australia?",
    "How many planets are in our solar system?",
]


def complete_sentences(text: str) -> str:
    """The text up to its last sentence end (., !, ?), or the whole text when it has none."""
    text = " ".join(text.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def main(splits: list[str]) -> None:
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_model(BUILTIN_MODEL, dtype="float32").eval()
    for split, questions in (("train", TRAIN), ("test", TEST)):
        if split not in splits:
            continue
        rows = []
        start = time.perf_counter()
        samples = generate_samples(model, tokenizer, questions, MAX_NEW_TOKENS)  # batched
        for i, (question, sample) in enumerate(zip(questions, samples, strict=True), 1):
            answer = complete_sentences(sample["completion"])
            kept = not degenerate(answer)
            if kept:
                rows.append({"instruction": question, "output": answer})
            print(
                f"{split} {i}/{len(questions)} ({time.perf_counter() - start:.1f} s) "
                f"{'kept' if kept else 'DROPPED'}: {question} -> {answer}",
                file=sys.stderr,
                flush=True,
            )
        with open(OUT / f"general_{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    main(sys.argv[1:] or ["train", "test"])
