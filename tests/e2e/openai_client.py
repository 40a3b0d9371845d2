"""The official openai Python SDK as a real client of unbusy, with its own retries off.

Usage: openai_client.py BASE_URL. Prints one JSON object with what each call returned.
"""
import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sdk-key", max_retries=0, timeout=30)
    out = {}
    done = client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hello from the sdk"}],
    )
    out["non_stream"] = done.choices[0].message.content
    chunks = client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "stream from the sdk"}],
        stream=True,
    )
    out["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    try:
        client.chat.completions.create(model="deepseek-chat", messages=[])
        out["bad"] = "accepted"
    except openai.BadRequestError as e:
        out["bad"] = e.status_code
    print(json.dumps(out))


if __name__ == "__main__":
    main()
