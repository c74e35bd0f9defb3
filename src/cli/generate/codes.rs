//! The names, places and codes (LOINC, SNOMED CT, RxNorm, CVX) generated resources are made of.

pub(super) const GIVEN_F: &[&str] = &[
    "Maria", "Emma", "Olivia", "Sofia", "Amara", "Hannah", "Mei", "Leila",
];
pub(super) const GIVEN_M: &[&str] = &[
    "James", "Noah", "Liam", "Mateo", "Kenji", "Omar", "Lukas", "Ethan",
];
pub(super) const FAMILY: &[&str] = &[
    "Smith",
    "Garcia",
    "Nguyen",
    "Müller",
    "Okafor",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "Silva",
    "Johansson",
    "Rossi",
    "Dubois",
];
pub(super) const CITIES: &[(&str, &str, &str)] = &[
    ("Boston", "MA", "02118"),
    ("Springfield", "MA", "01103"),
    ("Worcester", "MA", "01608"),
    ("Cambridge", "MA", "02139"),
    ("Lowell", "MA", "01852"),
];
/// (LOINC, display, unit, low, high)
pub(super) const VITALS: &[(&str, &str, &str, f64, f64)] = &[
    ("8867-4", "Heart rate", "/min", 55.0, 110.0),
    ("9279-1", "Respiratory rate", "/min", 12.0, 22.0),
    ("8310-5", "Body temperature", "Cel", 36.1, 38.4),
    ("29463-7", "Body weight", "kg", 45.0, 120.0),
    ("8302-2", "Body height", "cm", 150.0, 195.0),
    (
        "39156-5",
        "Body mass index (BMI) [Ratio]",
        "kg/m2",
        18.0,
        38.0,
    ),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        70.0,
        180.0,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        140.0,
        260.0,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        9.5,
    ),
];
/// (SNOMED CT, display)
pub(super) const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("55822004", "Hyperlipidemia"),
    ("40055000", "Chronic sinusitis"),
    ("195967001", "Asthma"),
    ("271737000", "Anemia"),
    ("35489007", "Depressive disorder"),
    ("239873007", "Osteoarthritis of knee"),
];
/// (RxNorm, display)
pub(super) const MEDICATIONS: &[(&str, &str)] = &[
    (
        "860975",
        "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
    ),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("308136", "amoxicillin 500 MG Oral Capsule"),
    ("313782", "Acetaminophen 325 MG Oral Tablet"),
    (
        "895994",
        "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    ),
    ("310965", "Ibuprofen 200 MG Oral Tablet"),
];
/// (SNOMED CT, display)
pub(super) const PROCEDURES: &[(&str, &str)] = &[
    ("430193006", "Medication Reconciliation (procedure)"),
    ("117015009", "Throat culture (procedure)"),
    ("73761001", "Colonoscopy"),
    ("71651007", "Mammography (procedure)"),
    ("36969009", "Placement of stent in coronary artery"),
    ("76601001", "Intramuscular injection"),
];
/// (CVX, display)
pub(super) const VACCINES: &[(&str, &str)] = &[
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("113", "Td (adult) preservative free"),
    ("133", "Pneumococcal conjugate PCV 13"),
    (
        "208",
        "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free",
    ),
    ("43", "Hep B, adult"),
];
/// (SNOMED CT, display)
pub(super) const ALLERGIES: &[(&str, &str)] = &[
    ("91936005", "Allergy to penicillin"),
    ("300913006", "Shellfish allergy"),
    ("232347008", "Dander (animal) allergy"),
    ("419474003", "Allergy to mould"),
];
/// (class code, SNOMED type code, display)
pub(super) const ENCOUNTER_TYPES: &[(&str, &str, &str)] = &[
    ("AMB", "185349003", "Encounter for check up (procedure)"),
    ("AMB", "185345009", "Encounter for symptom"),
    ("AMB", "410620009", "Well child visit (procedure)"),
    ("EMER", "50849002", "Emergency room admission (procedure)"),
    ("IMP", "32485007", "Hospital admission (procedure)"),
];

pub(super) const SNOMED: &str = "http://snomed.info/sct";
pub(super) const LOINC: &str = "http://loinc.org";
