"""Chat with the server started by examples/serve.sh, streaming, then print its spec-decode counters.

    python examples/client.py [PORT]
"""

import sys
import urllib.request

from openai import OpenAI

port = sys.argv[1] if len(sys.argv) > 1 else "8000"
base = f"http://127.0.0.1:{port}"
client = OpenAI(base_url=base + "/v1", api_key="unused")
stream = client.chat.completions.create(
    model="smollm2", temperature=0.0, max_tokens=200, stream=True,
    messages=[{"role": "user", "content": "Summarize: the cache is warm; the cache is warm again. What is warm?"}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
with urllib.request.urlopen(base + "/metrics") as r:
    for line in r.read().decode().splitlines():
        if line.startswith("vllm:spec_decode_num_") and "per_pos" not in line:
            print(line)
