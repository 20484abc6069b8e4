"""Write lorakit's built-in `concise` preference set (src/lorakit/data/datasets/concise_*.jsonl).

Each row is a question with a short, direct answer (chosen) and the same answer wrapped in a
rambling preamble and afterword (rejected), so preference tuning on it teaches one plain style:
answer first, no filler. The wrapping is drawn from fixed phrases with a fixed seed, so the
files are the same on every run. `test` holds questions not in `train`.

    python scripts/make_concise_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parents[1] / "src" / "lorakit" / "data" / "datasets"

QUESTIONS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("How many days are in a week?", "Seven."),
    ("What is 7 times 8?", "56."),
    ("What color is the sky on a clear day?", "Blue."),
    ("Which planet is closest to the Sun?", "Mercury."),
    ("What gas do plants take in from the air?", "Carbon dioxide."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the boiling point of water at sea level in Celsius?", "100 °C."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many minutes are in an hour?", "Sixty."),
    ("What is the chemical symbol for gold?", "Au."),
    ("What is the opposite of hot?", "Cold."),
    ("How many continents are there?", "Seven."),
    ("What is the square root of 81?", "9."),
    ("Which animal is known as the king of the jungle?", "The lion."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("What is the freezing point of water in Celsius?", "0 °C."),
    ("How many sides does a triangle have?", "Three."),
    ("What is the capital of Italy?", "Rome."),
    ("What do bees make?", "Honey."),
    ("What is 12 plus 15?", "27."),
    ("Which organ pumps blood through the body?", "The heart."),
    ("What is the tallest mountain on Earth?", "Mount Everest."),
    ("How many hours are in a day?", "24."),
    ("What is the main ingredient of bread?", "Flour."),
    ("Which season comes after winter?", "Spring."),
    ("What is the capital of Germany?", "Berlin."),
    ("How many wheels does a bicycle have?", "Two."),
    ("What is H2O commonly called?", "Water."),
    ("Which star is at the center of our solar system?", "The Sun."),
    ("What is 100 divided by 4?", "25."),
    ("What is the capital of Spain?", "Madrid."),
    ("How many months are in a year?", "Twelve."),
    ("What is the largest planet in our solar system?", "Jupiter."),
    ("What instrument has 88 keys?", "The piano."),
    ("What is the capital of Canada?", "Ottawa."),
    ("How many strings does a standard guitar have?", "Six."),
    ("What is 9 minus 4?", "5."),
]
TEST = 8  # the last questions are the held-out pairs

PREAMBLES = [
    "Well, that is a really great question, and I am so glad you asked it!",
    "Oh, what an interesting thing to wonder about! Let me think about this carefully.",
    "Great question! Many people ask about this, so let me walk you through it.",
    "Hmm, let me see. This is something I find fascinating, to be honest.",
    "Thank you for asking! Before I answer, I want to say how much I enjoy questions like this.",
]
AFTERWORDS = [
    "I hope this helps, and please feel free to ask me anything else you are curious about!",
    "Let me know if you would like me to explain any of this in more detail!",
    "Isn't that interesting? There is always so much more to learn about the world.",
    "I really hope that answers your question, and thank you again for asking it!",
]


def make_rows(seed: int = 0) -> list[dict[str, str]]:
    """One pair per question: the direct answer, and the same answer wrapped in filler."""
    rng = random.Random(seed)
    rows = []
    for question, answer in QUESTIONS:
        rambling = f"{rng.choice(PREAMBLES)} The answer is: {answer} {rng.choice(AFTERWORDS)}"
        rows.append({"prompt": question, "chosen": answer, "rejected": rambling})
    return rows


def main() -> None:
    rows = make_rows()
    for name, part in (("train", rows[:-TEST]), ("test", rows[-TEST:])):
        with open(OUT / f"concise_{name}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
