use super::*;

#[test]
fn uuids_look_like_v4() {
    let mut rng = Rng::new(7);
    let u = rng.uuid();
    assert_eq!(u.len(), 36);
    assert_eq!(&u[14..15], "4");
    assert!(uuid::Uuid::parse_str(&u).is_ok());
}
