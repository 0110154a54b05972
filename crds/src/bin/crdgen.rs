//! `crdgen`: print the KefuCluster CRD as YAML (`make generate` writes it to `crds/kefucluster.yaml` and the
//! operator chart; `make check-generated` fails when the committed copies drift).

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", kefu_crds::crd_yaml()?);
    Ok(())
}
