"""Write trace_smollm2.json: reference numbers for `llamascope trace` on the default model, made by
an independent route: transformers reads and dequantizes the GGUF file itself and runs its own
LlamaForCausalLM. Run by hand (about a minute): python tests/golden/make_trace_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT = "My name is Mariama, my favorite"
MAX_NEW_TOKENS = 8
TOP = 5


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from llamascope.loading import default_model_path

    path = default_model_path()
    settings = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config = LlamaConfig(**{k: v for k, v in settings.items() if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    ids = tokenizer(PROMPT).input_ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        probs = model(tokens).logits[0].float().softmax(-1)  # [T, V]
        out = model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    best = probs.max(-1)
    top = torch.topk(probs[-1], TOP)
    golden = {
        "model": path.name,
        "made_by": "transformers " + __import__("transformers").__version__ + " (GGUF dequantized by transformers)",
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompt_ids": ids,
        "predicted_ids": best.indices.tolist(),
        "predicted_probs": [round(p, 5) for p in best.values.tolist()],
        "predictions_text": "".join(tokenizer.decode([i]) for i in best.indices.tolist()),
        "output_ids": out[0, len(ids) :].tolist(),
        "text": tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True),
        "first_step_top_ids": top.indices.tolist(),
        "first_step_top_probs": [round(p, 5) for p in top.values.tolist()],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    target = Path(__file__).with_name("trace_smollm2.json")
    target.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
