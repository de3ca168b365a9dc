"""Pytest configuration: put the repository root on sys.path so that tests import the project packages."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
