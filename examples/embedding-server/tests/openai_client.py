"""Drives the embedding server with the official `openai` Python client, as its users do.

Reads {"base_url", "texts"} on stdin and prints JSON:
- "sent": the body the client sent when no encoding_format was given (it asks for base64);
- "raw": that answer's data[i].embedding as it came over the wire (a base64 string, or null);
- "default": the vectors the client decoded from it (float32 values as Python floats, or null);
- "float": the vectors of an encoding_format="float" call;
- "base64": the strings of an explicit encoding_format="base64" call (the client leaves them as is);
- "tiller": data[i].tiller of the default call, which the client keeps as an extra field;
- "bad": the client's error for encoding_format="int8": its class, HTTP status and body.
"""
import json
import sys

import openai


def main():
    req = json.load(sys.stdin)
    client = openai.OpenAI(base_url=req["base_url"], api_key="unused", max_retries=0, timeout=120)
    texts = req["texts"]
    model = "all-MiniLM-L6-v2"

    raw = client.embeddings.with_raw_response.create(model=model, input=texts)
    sent = json.loads(raw.http_request.content)
    wire = [d["embedding"] for d in raw.http_response.json()["data"]]
    default = raw.parse()
    as_float = client.embeddings.create(model=model, input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model=model, input=texts, encoding_format="base64")

    bad = None
    try:
        client.embeddings.create(model=model, input=texts, encoding_format="int8")
    except openai.APIStatusError as e:
        bad = {"class": type(e).__name__, "status": e.status_code, "body": e.body}

    json.dump(
        {
            "sent": sent,
            "raw": wire,
            "default": [d.embedding for d in default.data],
            "float": [d.embedding for d in as_float.data],
            "base64": [d.embedding for d in as_b64.data],
            "tiller": [(d.model_extra or {}).get("tiller") for d in default.data],
            "bad": bad,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
