"""Model specs from the job config and model loading."""
