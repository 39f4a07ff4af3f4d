"""relex inside trainers: ``relex.integrations.trl.RelexCallback`` (needs transformers)."""
