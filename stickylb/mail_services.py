"""Well-known mail services by the names nodemailer users already write in ``email.service``."""

from __future__ import annotations

from typing import Literal, NamedTuple

Security = Literal["none", "starttls", "tls"]


class MailService(NamedTuple):
    host: str
    port: int
    security: Security


KNOWN_MAIL_SERVICES: dict[str, MailService] = {
    "gmail": MailService("smtp.gmail.com", 465, "tls"),
    "googlemail": MailService("smtp.gmail.com", 465, "tls"),
    "outlook": MailService("smtp-mail.outlook.com", 587, "starttls"),
    "hotmail": MailService("smtp-mail.outlook.com", 587, "starttls"),
    "office365": MailService("smtp.office365.com", 587, "starttls"),
    "yahoo": MailService("smtp.mail.yahoo.com", 465, "tls"),
    "icloud": MailService("smtp.mail.me.com", 587, "starttls"),
    "zoho": MailService("smtp.zoho.com", 465, "tls"),
    "sendgrid": MailService("smtp.sendgrid.net", 587, "starttls"),
    "mailgun": MailService("smtp.mailgun.org", 587, "starttls"),
    "fastmail": MailService("smtp.fastmail.com", 465, "tls"),
}
