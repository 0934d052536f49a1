"""Tests of engine.rewards and engine.data.prompts."""
