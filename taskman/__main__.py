from taskman.cli import app

app()
