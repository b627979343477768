"""The commands, one module each: `restorer COMMAND` (restorer/__main__.py) runs them."""
