"""An example app that composes llava-serve through a handle: caption each image it is given.

    serve run serve_config.yaml            # llava-serve as app "llava"
    serve run deployments.captioner:app    # this app, in the same cluster

Another team's app needs nothing from ours but the app name and the OpenAI request shape.
"""

from __future__ import annotations

from ray import serve


def caption_request(image_url: str, max_tokens: int) -> dict:
    """The OpenAI-shaped request this app sends for one image."""
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "Write a one-line caption for this image."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Captioner:
    def __init__(self, llava_app: str = "llava", max_tokens: int = 32):
        self.llava = serve.get_app_handle(llava_app)
        self.max_tokens = max_tokens

    async def caption(self, image_url: str) -> str:
        """Stream the answer from llava-serve and return the joined text."""
        stream = self.llava.options(stream=True).chat_stream.remote(
            caption_request(image_url, self.max_tokens)
        )
        parts = [c["choices"][0]["delta"].get("content") or "" async for c in stream if c["choices"]]
        return "".join(parts)

    async def caption_many(self, image_urls: list[str]) -> list[str]:
        """Non-streamed calls, issued together so llava-serve batches them."""
        responses = [self.llava.chat.remote(caption_request(url, self.max_tokens)) for url in image_urls]
        return [(await r)["choices"][0]["message"]["content"] for r in responses]


app = Captioner.bind()
