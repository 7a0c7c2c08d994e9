"""transformers (PyTorch) side of the decode benchmark. Runs in the reference environment.

Usage: python hf_generate.py SPEC.json OUT.json

SPEC: {"config": <config.json dict>, "batch_sizes": [...], "prompt_len": int,
"new_tokens": int, "repeats": int, "threads": int, "seed": int, "timer": "wall" | "cpu"}.
Builds the model from the config with random weights (fp32), then times greedy `generate`
(KV cache on) per batch size after one warm-up call, by wall clock or by this process's CPU
time. Writes {"torch": version, "results": [{"batch", "seconds": [...], "new_tokens"}]}.
"""
import json
import os
import sys
import tempfile
import time

import torch
import transformers


def main(spec_path, out_path):
  with open(spec_path) as f:
    spec = json.load(f)
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(spec["config"], f)
    config = transformers.AutoConfig.from_pretrained(d)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  n = spec["new_tokens"]
  clock = time.process_time if spec.get("timer") == "cpu" else time.perf_counter
  results = []
  for b in spec["batch_sizes"]:
    gen = torch.Generator().manual_seed(spec["seed"] + b)
    ids = torch.randint(1, config.vocab_size, (b, spec["prompt_len"]), generator=gen)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.inference_mode():
      model.generate(ids, **kwargs)  # warm-up
      seconds = []
      for _ in range(spec["repeats"]):
        start = clock()
        out = model.generate(ids, **kwargs)
        seconds.append(clock() - start)
    assert out.shape == (b, spec["prompt_len"] + n), out.shape
    results.append(dict(batch=b, seconds=seconds, new_tokens=n))
  with open(out_path, "w") as f:
    json.dump(dict(torch=torch.__version__, transformers=transformers.__version__,
                   threads=torch.get_num_threads(), results=results), f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
