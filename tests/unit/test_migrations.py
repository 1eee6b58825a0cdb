"""The revision list a serving node checks against is the one the alembic scripts define."""

from tusingest.sessions import migrations


def test_known_revisions_are_the_alembic_scripts_in_order() -> None:
    assert list(migrations.KNOWN_REVISIONS) == migrations.script_revisions()


def test_head_revision_is_the_newest_script() -> None:
    assert migrations.head_revision() == migrations.script_revisions()[-1]
