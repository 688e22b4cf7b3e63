"""The hospital FHIR server: client, authentication, patient match, patient context."""
