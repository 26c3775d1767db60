mod desired;
mod model;
mod plan;
mod source;
mod topology;

fn main() {}
