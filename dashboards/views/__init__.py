"""The dashboard's pages: each file is a script Streamlit runs when its page is open. (Not named pages/:
Streamlit would also list such a folder by file name, next to the st.navigation menu.)"""
