import humanize
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def root() -> dict[str, str]:
    return {"size": humanize.naturalsize(1_000_000), "humanize": humanize.__version__}
