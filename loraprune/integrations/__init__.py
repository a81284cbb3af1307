"""Integrations with serving engines. Each submodule imports its engine lazily, so importing this
package (or ``loraprune``) works without any engine installed."""
