"""Golden outputs from transformers (PyTorch). Runs in the reference environment only.

Usage: python hf_reference.py SPEC.json OUT.npz

SPEC is a list of jobs: {"name", "model_dir", "create": bool, "seed": int,
"input_ids": [[...]], "attention_mask": [[...]] | null}. With "create", the model is built
from the `config.json` already in model_dir (random weights, seeded) and saved there as
safetensors; otherwise it is loaded from model_dir. Logits of each job go to OUT under its
name. One process serves many jobs because importing torch dominates the cost.
"""
import json
import sys

import numpy as np
import torch
import transformers


def _model_class(config):
  if config.model_type == "qwen2_5_vl":
    return transformers.Qwen2_5_VLForConditionalGeneration
  return transformers.AutoModelForCausalLM


def main(spec_path, out_path):
  with open(spec_path) as f:
    jobs = json.load(f)
  out = {}
  for job in jobs:
    config = transformers.AutoConfig.from_pretrained(job["model_dir"])
    cls = _model_class(config)
    if job.get("create"):
      torch.manual_seed(job.get("seed", 0))
      model = cls.from_config(config, torch_dtype=torch.float32)
      # Random norms and biases, so that a swapped or dropped tensor shows in the logits.
      with torch.no_grad():
        for name, p in model.named_parameters():
          if p.ndim == 1:
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
      model.save_pretrained(job["model_dir"], safe_serialization=True)
    else:
      model = cls.from_pretrained(job["model_dir"], torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor(job["input_ids"], dtype=torch.long)
    kwargs = {}
    if job.get("attention_mask") is not None:
      kwargs["attention_mask"] = torch.tensor(job["attention_mask"], dtype=torch.long)
    with torch.no_grad():
      logits = model(input_ids=ids, **kwargs).logits
    out[job["name"]] = logits.float().numpy()
    if job.get("generate"):
      with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=job["generate"], do_sample=False,
                             pad_token_id=0)
      out[job["name"] + "/generate"] = gen.numpy()
  np.savez(out_path, **out)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
