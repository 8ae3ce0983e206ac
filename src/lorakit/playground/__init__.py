"""The playground: a page in the browser to try, compare and choose adapters side by side.

`lorakit playground` (and `lorakit serve`, which serves the same page) is the OpenAI-compatible
server of `lorakit.infer.server` with extra routes (`routes.Playground`): the page's static files
(``static/``, open without the API key) and the endpoints it reads, which join what the jobs
below know: the training runs (`lorakit.train.runs`), their held-out examples (`lorakit.data`)
and scores (`lorakit.evaluation`), and the models the server holds (`lorakit.infer`). It sits in
the layer of `lorakit.export`, above train and infer, which never import each other.
docs/PLAYGROUND.md describes the page and the endpoints.
"""

from lorakit.playground.routes import STATIC_DIR, Playground, load_playground

__all__ = ["Playground", "load_playground", "STATIC_DIR"]
