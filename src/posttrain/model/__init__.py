"""Models: loading, PEFT, attention over packed sequences, lean layers, target log-probs and the forward passes."""
