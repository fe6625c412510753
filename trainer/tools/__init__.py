"""Tools: commands built on the engine's front door (doctor, memory estimate, bench, merge, the argument docs).

They call the engine and never patch it; nothing in the engine imports them."""
