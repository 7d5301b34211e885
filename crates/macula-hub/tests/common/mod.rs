pub mod pytuf;
