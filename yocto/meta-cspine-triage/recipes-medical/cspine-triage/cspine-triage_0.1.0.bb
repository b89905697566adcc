SUMMARY = "Cervical-spine fracture triage daemon: DICOM in, MQTT alerts out"
DESCRIPTION = "Headless daemon for edge boxes beside a CT scanner: a DICOM Storage SCP \
               with a durable spool, series assembly, an ONNX model run with tract, and \
               alerts published over MQTT from a durable outbox. Runs as a hardened \
               systemd service."
# Placeholder until the project has a public home: set it in a bbappend.
HOMEPAGE = "https://example.invalid/cspine-triage"
SECTION = "console/utils"
# The daemon is Apache-2.0; the statically linked crates add the others (from the
# license fields of `cargo metadata --filter-platform aarch64-unknown-linux-gnu`:
# CharLS BSD-3-Clause, aws-lc/ring ISC, jpeg decoders IJG; unicode tables also carry
# Unicode-3.0).
LICENSE = "Apache-2.0 & MIT & BSD-2-Clause & BSD-3-Clause & ISC & Zlib & IJG & CC0-1.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10 \
                    file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302 \
                    file://${COMMON_LICENSE_DIR}/BSD-2-Clause;md5=cb641bc04cda31daea161b1bc15da69f \
                    file://${COMMON_LICENSE_DIR}/BSD-3-Clause;md5=550794465ba0ec5312d6919e203a55f9 \
                    file://${COMMON_LICENSE_DIR}/ISC;md5=f3b90e78ea0cffb20bf5cca7947a896d \
                    file://${COMMON_LICENSE_DIR}/Zlib;md5=87f239f408daca8a157858e192597633 \
                    file://${COMMON_LICENSE_DIR}/IJG;md5=d9fc5ebaa95c14466091d25e0d34e688 \
                    file://${COMMON_LICENSE_DIR}/CC0-1.0;md5=0ceb3372c9595f0a8067e55da801e4a1"

# Release builds fetch a source tree from git: set CSPINE_TRIAGE_GIT_URI and
# CSPINE_TRIAGE_SRCREV (a tag's commit) in local.conf or a bbappend. The kas
# configuration in yocto/kas/ builds the local checkout with externalsrc instead.
CSPINE_TRIAGE_GIT_URI ??= "git://example.invalid/cspine-triage.git;protocol=https;branch=main"
CSPINE_TRIAGE_SRCREV ??= "${AUTOREV}"

# CharLS (JPEG-LS, C++) is built by the cmake crate; aws-lc (MQTT TLS) by cc/cmake.
DEPENDS += "cmake-native"

PV .= "+git"
SRC_URI = "${CSPINE_TRIAGE_GIT_URI}"
SRCREV = "${CSPINE_TRIAGE_SRCREV}"
S = "${WORKDIR}/git"

# One crate:// SRC_URI per Cargo.lock entry: regenerate with scripts/gen-yocto-crates.py
# (or `bitbake -c update_crates cspine-triage`) after every Cargo.lock change.
require cspine-triage-crates.inc

inherit cargo_bin cargo-update-recipe-crates systemd useradd

# meta-rust-bin's cargo_bin runs plain cargo and does not vendor crates. Keep the build
# offline and checksummed: cargo reads the crates that bitbake fetched and sha256-checked
# from the SRC_URIs above; the crate fetcher unpacks them to ${WORKDIR}/cargo_home/bitbake
# (= ${CARGO_HOME}/bitbake with cargo_bin).
CSPINE_TRIAGE_CRATES_DIR ?= "${WORKDIR}/cargo_home/bitbake"
EXTRA_CARGO_FLAGS = "--frozen --bin cspine-triage"
# CPU build by default. GPU: CARGO_FEATURES = "cuda-12060" for JetPack 6
# (see docs/DEPLOYMENT.md for the CUDA API levels tract-cuda supports).
CARGO_FEATURES ??= ""

do_configure:append() {
    printf '\n[source.bitbake]\ndirectory = "%s"\n\n[source.crates-io]\nreplace-with = "bitbake"\nlocal-registry = "/nonexistent"\n' \
        "${CSPINE_TRIAGE_CRATES_DIR}" >>"${CARGO_HOME}/config"
}

do_install:append() {
    install -d ${D}${datadir}/cspine-triage/model
    install -m 0644 ${S}/models/model.json ${D}${datadir}/cspine-triage/model/
    install -m 0644 ${S}/models/*.onnx ${D}${datadir}/cspine-triage/model/

    install -d ${D}${sysconfdir}/cspine-triage
    install -m 0644 ${S}/systemd/config.toml ${D}${sysconfdir}/cspine-triage/config.toml

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/cspine-triage.service ${D}${systemd_system_unitdir}/
    install -d ${D}${nonarch_libdir}/sysusers.d
    install -m 0644 ${S}/systemd/cspine-triage.sysusers ${D}${nonarch_libdir}/sysusers.d/cspine-triage.conf
    install -d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/cspine-triage.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/cspine-triage.conf

    # Optional drop-ins, shipped but not enabled: copy to
    # /etc/systemd/system/cspine-triage.service.d/ to use (docs/DEPLOYMENT.md).
    install -d ${D}${datadir}/cspine-triage/systemd
    install -m 0644 ${S}/systemd/cuda.conf ${S}/systemd/port104.conf ${D}${datadir}/cspine-triage/systemd/
    install -d ${D}${docdir}/cspine-triage
    install -m 0644 ${S}/docs/DEPLOYMENT.md ${D}${docdir}/cspine-triage/
}

SYSTEMD_SERVICE:${PN} = "cspine-triage.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# The same user as systemd/cspine-triage.sysusers, created at image build time so that
# it exists before first boot (read-only root filesystems, file ownership in the image).
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/cspine-triage --no-create-home \
                       --shell /sbin/nologin --user-group cspine-triage"

FILES:${PN} += "${nonarch_libdir}/sysusers.d/cspine-triage.conf \
                ${nonarch_libdir}/tmpfiles.d/cspine-triage.conf"
CONFFILES:${PN} = "${sysconfdir}/cspine-triage/config.toml"
