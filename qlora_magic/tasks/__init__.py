"""What each verb does, over the session's model: fine-tuning, evaluation, comparison, merging, tuning.
A task takes the session and a config, uses the engine, and returns a result with a text and HTML form.
Tasks call each other and the engine, never the public `api`."""
