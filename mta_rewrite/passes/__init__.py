"""Graph passes over exported programs, one concern each: match (detect and describe attention
in canonical form), sites (name and report it), lower (rewrite it into mta.attention)."""
