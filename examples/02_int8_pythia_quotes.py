"""8-bit base + LoRA on a GPT-NeoX (Pythia-shaped) model, trained on quotes, then sampled.

A small GPTNeoX model (fused `query_key_value` attention, `dense` projections) is first trained
briefly in full precision on byte-level text so it is a (tiny) base model; its linear layers are
then stored in int8 with `lorakit.quant.quantize_model`, LoRA is put on `query_key_value` and
`dense`, trained on the same quotes, and the result is sampled with temperature, top_p, top_k and
repetition_penalty. The quotes come from Debian's `fortunes` when installed, else from
examples/data/quotes.txt.

    python examples/02_int8_pythia_quotes.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.quant import QuantLinear, quantize_model

FORTUNES = Path("/usr/share/games/fortunes/fortunes")
SHIPPED = Path(__file__).parent / "data" / "quotes.txt"
EOS = 256  # byte-level vocabulary: 256 bytes + end of quote


def load_quotes(limit: int) -> list[str]:
    """Quotes split on lines holding a single `%` (the fortune file format)."""
    source = FORTUNES if FORTUNES.is_file() else SHIPPED
    text = source.read_text(encoding="utf-8", errors="replace")
    quotes = [q.strip() for q in text.split("\n%\n") if 10 < len(q.strip()) < 200]
    return quotes[:limit]


def batches(quotes: list[str], size: int, length: int, seed: int):
    """Endless (input_ids, labels) batches of byte-encoded quotes, padded with -100 labels."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randint(len(quotes), (size,), generator=g).tolist()
        ids = torch.full((size, length), EOS)
        labels = torch.full((size, length), -100)
        for row, i in enumerate(pick):
            encoded = list(quotes[i].encode())[: length - 1] + [EOS]
            ids[row, : len(encoded)] = torch.tensor(encoded)
            labels[row, : len(encoded)] = torch.tensor(encoded)
        yield ids, labels


def train(model, data, steps: int, lr: float) -> float:
    """AdamW on the trainable parameters; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids, labels = next(data)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    args = parser.parse_args()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    hidden, layers, steps = (32, 2, 4) if args.tiny else (256, 4, 300)
    config = GPTNeoXConfig(
        vocab_size=EOS + 1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=256,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    model = GPTNeoXForCausalLM(config)
    quotes = load_quotes(2000)
    data = batches(quotes, size=4 if args.tiny else 16, length=128, seed=0)
    base_loss = train(model, data, steps, lr=3e-3)
    print(f"base model trained in fp32 on {len(quotes)} quotes: loss {base_loss:.3f}")

    quantize_model(model, "int8")  # every linear layer but the output head, in int8
    n_int8 = sum(isinstance(m, QuantLinear) for m in model.modules())
    lora = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value", "dense"])
    )
    lora.print_trainable_parameters()
    lora_loss = train(lora, data, steps, lr=2e-3)
    print(f"LoRA over {n_int8} int8 layers: loss {lora_loss:.3f}")

    prompt = torch.tensor([list(b"The ")])
    with torch.no_grad():
        out = lora.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8 if args.tiny else 80,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            top_k=40,
            repetition_penalty=1.2,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
    text = bytes(t for t in out[0].tolist() if t < EOS).decode("utf-8", errors="replace")
    print(f"sample: {text!r}")
    return {"base_loss": base_loss, "lora_loss": lora_loss, "int8_layers": n_int8}


if __name__ == "__main__":
    main()
