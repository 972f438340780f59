//! `sluice rules new NAME --lang …`: a ready-to-build rule project.
//! (Being written: see the helper's task.)

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    C,
    Assemblyscript,
    Rust,
}

pub fn create(name: &str, lang: Lang, dir: &std::path::Path) -> anyhow::Result<()> {
    let _ = (name, lang, dir);
    anyhow::bail!("not written yet")
}
