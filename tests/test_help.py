"""`--help` of every script lists each flag's default: a value, or the rule that sets it; never `default: None`."""
import re

import pytest

import common
import eval_linear
import opera
import rotssl
import trex
import univip

SCRIPTS = {"opera": opera, "trex": trex, "univip": univip, "rotssl": rotssl, "eval_linear": eval_linear}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_shows_its_default_or_rule(name):
    parser = SCRIPTS[name].get_args_parser()
    assert parser.formatter_class is common.HelpFormatter
    formatter = parser._get_formatter()
    without_default = [a.option_strings[0] for a in parser._actions if a.help != "show this help message and exit"
                       and "default" not in formatter._get_help_string(a)]
    assert not without_default, f"{name}: no default shown for {without_default}"
    text = re.sub(r"\s+", " ", parser.format_help())
    assert "default: None" not in text and "(default: " in text


def test_opera_help_shows_values_and_rules():
    """opera.py's --help showed no default at all; now the values, and the recipe's rule per --arch."""
    text = re.sub(r"\s+", " ", opera.get_args_parser().format_help())
    assert "0 = plain MoCo v3 (no class head) (default: 0.5)" in text  # --sup-weight
    assert "(default: by --arch: ResNet 0.3, ViT 0.00015, resnet_tiny 2.4)" in text  # --lr


def test_a_rule_needs_its_text():
    """A flag left at None whose help states no rule is caught: the formatter then prints argparse's default."""
    parser = common.argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    parser.add_argument("--x", default=None, help="something")
    parser.add_argument("--y", default=None, help="something (default: twice --x)")
    text = re.sub(r"\s+", " ", parser.format_help())
    assert "something (default: None)" in text and "something (default: twice --x)" in text
