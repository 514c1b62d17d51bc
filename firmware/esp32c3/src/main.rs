//! edgegw sensor node on an ESP32-C3: speaks MQTT-SN 1.2 in COBS + CRC frames over the chip's
//! built-in USB serial port (USB-Serial-JTAG) to the gateway's `nodes.serial` link, publishes
//! the chip's temperature sensor to `sensors/<id>/temp` every few seconds, and switches the LED
//! GPIO on `control/<id>/led` (`on`, `off`, `toggle`). The protocol client is `edgegw-node`,
//! the same code the gateway's tests run on the host; this file only wires it to the chip.
//!
//! `<id>` is `esp32c3-` and the last three bytes of the chip's MAC address, so every board has
//! its own topics without configuration.

#![no_std]
#![no_main]

use edgegw_node::{Led, Node, Settings};
use esp_hal::{
    clock::CpuClock,
    delay::Delay,
    gpio::{Level, Output, OutputConfig},
    main,
    time::Instant,
    tsens::{self, TemperatureSensor},
    usb::usb_serial_jtag::UsbSerialJtag,
};

esp_bootloader_esp_idf::esp_app_desc!();

/// Time between two readings.
const INTERVAL_MS: u32 = 5_000;
/// Keepalive announced to the gateway.
const KEEPALIVE_S: u16 = 30;
/// The LED: GPIO8 drives the on-board LED of ESP32-C3 SuperMini boards, which lights when the
/// pin is low. For an LED from the pin to ground, set `LED_ACTIVE_LOW` to false.
const LED_ACTIVE_LOW: bool = true;
/// How long one frame may wait for the host to read the USB FIFO before it is dropped (no
/// host attached, or a host that does not read): the protocol repeats what matters.
const WRITE_TIMEOUT_MS: u64 = 50;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // A node that cannot go on starts again: the gateway sees it reconnect.
    esp_hal::system::software_reset()
}

fn now_ms() -> u64 {
    Instant::now().duration_since_epoch().as_millis()
}

/// `esp32c3-` and the MAC's last three bytes in hex.
fn client_id(buffer: &mut [u8; 14]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mac = esp_hal::efuse::base_mac_address();
    let mac = mac.as_bytes();
    buffer[..8].copy_from_slice(b"esp32c3-");
    for (i, byte) in mac[mac.len() - 3..].iter().enumerate() {
        buffer[8 + 2 * i] = HEX[usize::from(byte >> 4)];
        buffer[9 + 2 * i] = HEX[usize::from(byte & 0x0f)];
    }
    // ASCII only, so always valid UTF-8.
    core::str::from_utf8(buffer).unwrap_or("esp32c3")
}

#[main]
fn main() -> ! {
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    let delay = Delay::new();

    let led_level = |on: bool| {
        if on != LED_ACTIVE_LOW {
            Level::High
        } else {
            Level::Low
        }
    };
    let mut led_on = false;
    let mut led = Output::new(peripherals.GPIO8, led_level(false), OutputConfig::default());

    let sensor = TemperatureSensor::new(peripherals.TSENS, tsens::Config::default()).ok();
    // The sensor needs a few hundred microseconds to settle after power-up.
    delay.delay_micros(500);

    let (mut rx, mut tx) = UsbSerialJtag::new(peripherals.USB_DEVICE).split();

    let mut id = [0u8; 14];
    let settings = Settings {
        client_id: client_id(&mut id),
        keepalive_s: KEEPALIVE_S,
        interval_ms: INTERVAL_MS,
    };
    let Ok(mut node) = Node::new(settings) else {
        // Cannot happen with the fixed settings above.
        esp_hal::system::software_reset()
    };

    // Writes one whole frame, or drops it when the host does not take it in time. A frame cut
    // short would run into the next one (frames only end with a delimiter): after one, the
    // next frame starts with a delimiter, so the gateway drops only the broken one.
    let mut cut_short = false;
    let mut write = |frame: &[u8]| {
        let deadline = now_ms() + WRITE_TIMEOUT_MS;
        let delimiter = [edgegw_node::DELIMITER];
        let lead: &[u8] = if cut_short { &delimiter } else { &[] };
        for &byte in lead.iter().chain(frame) {
            while tx.write_byte_nb(byte).is_err() {
                if now_ms() > deadline {
                    cut_short = true;
                    return;
                }
            }
        }
        cut_short = false;
        while tx.flush_tx_nb().is_err() {
            if now_ms() > deadline {
                return;
            }
        }
    };

    let mut chunk = [0u8; 64];
    loop {
        let now = now_ms();
        let mut read_temperature = || {
            sensor
                .as_ref()
                .map_or(f32::NAN, |sensor| sensor.get_temperature().to_celsius())
        };
        // Errors are encoding overflows, impossible with these settings: nothing to do.
        let _ = node.poll(now, &mut read_temperature, &mut write);

        let n = rx.drain_rx_fifo(&mut chunk);
        if n > 0 {
            let _ = node.receive(&chunk[..n], now_ms(), &mut write, &mut |command| {
                led_on = match command {
                    Led::On => true,
                    Led::Off => false,
                    Led::Toggle => !led_on,
                };
                led.set_level(led_level(led_on));
            });
        } else {
            // Nothing to read: a short nap. The host's data waits meanwhile (USB flow control
            // holds it until the 64-byte FIFO is read), so nothing is lost.
            delay.delay_millis(1);
        }
    }
}
