"""What training costs, for every provider that bills per token (plain functions)."""


def cost(tokens, price_per_million):
    """USD for `tokens` billed tokens at a price per 1M tokens."""
    return round((tokens or 0) * (price_per_million or 0.0) / 1e6, 4)
