//! Turning decoded frames into deliverables: H.264 in an MP4 (openh264 built from source, muxed
//! with muxide; no external programs) and PNG stills.

use openh264::OpenH264API;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType};
use openh264::formats::{RgbSliceU8, YUVBuffer};

/// Errors of the media encoders, with what failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("H.264 encoder: {0}")]
    Encoder(String),
    #[error("MP4 muxer: {0}")]
    Muxer(String),
    #[error("PNG: {0}")]
    Png(String),
    #[error("frame size {width}×{height} must be positive and even (YUV 4:2:0)")]
    Size { width: usize, height: usize },
}

/// One frame `[3, H, W]` in [−1, 1] (the VAE's output) to packed RGB8, as the reference's
/// post-processing: `round(((x + 1) / 2).clamp(0, 1) · 255)`.
pub fn to_rgb8(frame: &[f32], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let mut rgb = vec![0u8; 3 * plane];
    for c in 0..3 {
        for (i, v) in frame[c * plane..(c + 1) * plane].iter().enumerate() {
            rgb[3 * i + c] = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    rgb
}

/// An H.264 MP4 being written to memory, one RGB frame at a time.
pub struct Mp4Writer {
    encoder: Encoder,
    muxer: muxide::api::Muxer<Vec<u8>>,
    width: usize,
    height: usize,
    fps: f64,
    frames: usize,
}

impl Mp4Writer {
    pub fn new(width: usize, height: usize, fps: u32) -> Result<Self, MediaError> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return Err(MediaError::Size { width, height });
        }
        // About 0.15 bits per pixel per frame, at least 200 kbit/s.
        let bps = ((width * height) as f64 * fps as f64 * 0.15).max(200_000.0) as u32;
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bps))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .skip_frames(false);
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| MediaError::Encoder(e.to_string()))?;
        let muxer = muxide::api::MuxerBuilder::new(Vec::new())
            .video(
                muxide::api::VideoCodec::H264,
                width as u32,
                height as u32,
                fps as f64,
            )
            .with_fast_start(true)
            .build()
            .map_err(|e| MediaError::Muxer(e.to_string()))?;
        Ok(Mp4Writer {
            encoder,
            muxer,
            width,
            height,
            fps: fps as f64,
            frames: 0,
        })
    }

    /// Append one packed RGB8 frame.
    pub fn push_rgb(&mut self, rgb: &[u8]) -> Result<(), MediaError> {
        if rgb.len() != 3 * self.width * self.height {
            return Err(MediaError::Encoder(format!(
                "frame of {} bytes for {}×{} RGB",
                rgb.len(),
                self.width,
                self.height
            )));
        }
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(rgb, (self.width, self.height)));
        let bits = self
            .encoder
            .encode(&yuv)
            .map_err(|e| MediaError::Encoder(e.to_string()))?;
        let key = matches!(bits.frame_type(), FrameType::IDR | FrameType::I);
        let data = bits.to_vec();
        self.muxer
            .write_video(self.frames as f64 / self.fps, &data, key)
            .map_err(|e| MediaError::Muxer(e.to_string()))?;
        self.frames += 1;
        Ok(())
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Finish the file and return its bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, MediaError> {
        self.muxer
            .finish_in_place()
            .map_err(|e| MediaError::Muxer(e.to_string()))?;
        Ok(self.muxer.into_writer())
    }
}

/// Encode packed RGB8 as a PNG file.
pub fn png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| MediaError::Png(e.to_string()))?;
        w.write_image_data(rgb)
            .map_err(|e| MediaError::Png(e.to_string()))?;
    }
    Ok(out)
}
