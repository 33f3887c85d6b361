"""Run inside Optimum's own environment (it pins transformers < 4.58): greedy tokens of an
artifact folder loaded with ORTModelForCausalLM, unchanged.

    python optimum_greedy.py ARTIFACT '[prompt ids]' NEW_TOKENS   -> JSON list of new token ids
"""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM

model = ORTModelForCausalLM.from_pretrained(sys.argv[1], use_cache=True, use_io_binding=False)
ids = torch.tensor([json.loads(sys.argv[2])])
new = int(sys.argv[3])
out = model.generate(
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    max_new_tokens=new,
    min_new_tokens=new,
    do_sample=False,
)
print(json.dumps(out[0, ids.shape[1] :].tolist()))
