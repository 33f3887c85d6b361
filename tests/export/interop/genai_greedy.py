"""Run inside onnxruntime-genai's own environment: greedy tokens of an artifact folder.

python genai_greedy.py ARTIFACT '[prompt ids]' NEW_TOKENS   -> JSON list of new token ids
"""

import json
import sys

import onnxruntime_genai as og

model = og.Model(sys.argv[1])
prompt = json.loads(sys.argv[2])
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + int(sys.argv[3]), do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
tokens = []
while not generator.is_done():
    generator.generate_next_token()
    tokens.append(int(generator.get_next_tokens()[0]))
print(json.dumps(tokens))
