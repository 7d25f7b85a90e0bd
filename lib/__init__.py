# Plain Python, no Odoo import: the logic the ORM layer calls, testable on its own.
