"""Fine-tuning jobs: states, hyperparameters, estimates, budgets, prices, summaries, the job folder."""
