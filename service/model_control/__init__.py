"""Model control: loading, reloading and unloading model versions while the server runs.

``--model-control-mode`` none (the default: what was found at start-up is served until exit),
poll (the repository is re-read every ``--repository-poll-seconds``) or explicit (only
``--load-model`` models at start-up, then the repository extension's load and unload calls).
See README.md, "Model control".
"""
