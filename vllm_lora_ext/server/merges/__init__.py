"""/v1/merges: its routes and the merge jobs (PEFT methods, IterIS, pool merges)."""
