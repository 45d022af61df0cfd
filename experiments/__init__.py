"""Research analyses and experiments (not speed measurements): each module runs as
`python -m experiments.NAME`; their outputs live in experiments/results/.

- growth: depth growth vs training from scratch (validation loss against steps)
- value_trend: does a sweep metric rise with the number of memory values (seed-level bootstrap)
- facts_by_attribute: recall exact match per fact attribute, per sweep arm
"""
