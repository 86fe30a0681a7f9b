"""The report's one chart home (altair): every chart has a title, a subtitle naming the
tokens it rests on, and axis titles with units. One module per stage's results."""
