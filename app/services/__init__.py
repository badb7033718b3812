"""Plain functions behind the UI, the API and the CLI, one module per tab. Handlers stay thin and call these."""
