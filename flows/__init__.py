"""Prefect flows of the AdaRound pipeline; ``python -m flows --help`` lists the stages."""
