fn main() {
    println!("xsam");
}
