"""The auto-trainer: watches the annotation journal, builds datasets, trains, evaluates, publishes. Never serves."""
